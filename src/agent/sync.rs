//! The sync engine: keeps the rule tracker fed, and makes the kernel match its plan by applying only
//! the difference.
//!
//! - Incremental sync: the planner's dirty keys (plus keys whose last operation failed) are
//!   diffed against the agent's model of the kernel, so one endpoint change costs one or two
//!   netlink operations however large the table is.
//! - Full sync (start-up, every resync period, after any failure): the kernel is dumped and
//!   the whole owned table compared. It repairs drift made by others and deletes TCP real
//!   servers that finished draining. It never flushes: an unchanged rule gives no operation, so
//!   an agent restart drops no connection.
//! - A failure leaves everything already programmed in place and schedules a full sync.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::dataplane::{Dataplane, DataplaneError};
use super::metrics::Metrics;
use super::nft::{self, MasqueradeOptions, NftSets, Reach};
use portpolicy_core::governance::{NamespaceLabels, PolicySet};
use portpolicy_core::ipvs::diff::{Ownership, diff, diff_keys};
use portpolicy_core::ipvs::{
    HealthCheckRule, ProxyConfig, ProxyMode, RuleTracker, StaleFlows, VirtualServerKind, VirtualServerRule,
    stale_udp_flows,
};
use portpolicy_core::ipvs::{IpvsOp, IpvsService, IpvsTable, VirtualServerKey};
use portpolicy_core::ports::{PortRange, Protocol};
use portpolicy_core::snapshot::Snapshot;
use portpolicy_netlink::NetlinkError;

/// One change in the cluster, as a watch or a snapshot reload reports it.
#[derive(Clone, Debug)]
pub enum Change {
    Snapshot(Box<Snapshot>),
    Service(Box<Service>),
    ServiceDeleted {
        namespace: String,
        name: String,
    },
    Slice(Box<EndpointSlice>),
    SliceDeleted {
        namespace: String,
        name: String,
    },
    Node(Box<Node>),
    Policies {
        policies: PolicySet,
        namespace_labels: NamespaceLabels,
    },
}

/// One thing that went wrong in a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The kernel refused one IPVS operation (the error names it).
    #[error(transparent)]
    Refused(NetlinkError),
}

impl SyncError {
    /// The errno the kernel answered with, when it was the kernel that said no.
    fn errno(&self) -> Option<i32> {
        match self {
            SyncError::Refused(e) => e.errno(),
            SyncError::Dataplane(e) => e.netlink().and_then(NetlinkError::errno),
        }
    }
}

/// Owned virtual servers present in one table and not the other, or configured differently
/// (scheduler, persistence, real servers and their weights; connection counters are the
/// kernel's and are not compared).
fn drifted_virtual_servers(model: &IpvsTable, kernel: &IpvsTable, ownership: &Ownership) -> usize {
    let same = |a: &IpvsService, b: &IpvsService| {
        a.scheduler == b.scheduler
            && a.persistence_timeout == b.persistence_timeout
            && a.real_servers.len() == b.real_servers.len()
            && a.real_servers.iter().all(|(key, state)| {
                b.real_servers
                    .get(key)
                    .is_some_and(|other| other.weight == state.weight)
            })
    };
    let keys: BTreeSet<&VirtualServerKey> = model.keys().chain(kernel.keys()).collect();
    keys.into_iter()
        .filter(|key| ownership.owns(key))
        .filter(|key| match (model.get(*key), kernel.get(*key)) {
            (Some(a), Some(b)) => !same(a, b),
            _ => true,
        })
        .count()
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub full: bool,
    pub operations: usize,
    pub failed_operations: usize,
    /// Everything that went wrong, for the log; empty when the sync fully succeeded.
    pub errors: Vec<SyncError>,
    /// What went wrong without making the sync fail (it is retried on the next sync anyway).
    pub warnings: Vec<SyncError>,
    /// The health-check listeners this node should run.
    pub health_checks: Vec<HealthCheckRule>,
}

impl SyncOutcome {
    pub fn succeeded(&self) -> bool {
        self.errors.is_empty()
    }
}

pub struct Syncer<D: Dataplane> {
    dataplane: D,
    tracker: RuleTracker,
    masquerade: MasqueradeOptions,
    metrics: Metrics,
    /// What the kernel holds as far as the agent knows: the last dump plus what was applied.
    kernel: IpvsTable,
    /// Addresses bound on the dummy interface, as last read or set.
    bound: BTreeSet<IpAddr>,
    /// Keys to diff again on the next incremental sync.
    retry: BTreeSet<VirtualServerKey>,
    /// Keys whose kernel entry still has real servers the plan dropped (weight 0, draining).
    draining: BTreeSet<VirtualServerKey>,
    needs_full: bool,
    /// Node-port ranges of policies that hand Services to the agent (delegated mode ownership).
    policy_ranges: Vec<PortRange>,
    /// Every node port planned since start: the agent may delete what it once programmed.
    node_ports_seen: BTreeSet<u16>,
    /// Every address a node port was planned on since start: when the Node loses one, the
    /// agent's node ports on it are still the agent's to delete.
    node_addresses_seen: BTreeSet<IpAddr>,
    /// Every address the node's interfaces held at the last full sync: a node port on any
    /// other address is one the Node lost, perhaps before this process started (delegated
    /// mode ownership, rule 4 of [`Ownership`]).
    host_addresses: Option<Arc<BTreeSet<IpAddr>>>,
    sysctls_done: bool,
    /// The set elements the plan wants, and what changed since they were last written.
    nft: NftSets,
    /// The layout (whether the ip6 table exists) of the table as last written whole; `None`
    /// when it must be written whole next (never written, or a write failed).
    nft_layout: Option<bool>,
    /// Whether this process wrote the ip6 table (and so removes it when nothing needs it).
    ipv6_written: bool,
    /// The reserved node ports must be written (they changed, or the last write failed).
    reserved_changed: bool,
    /// Whether `kernel` is what the kernel should hold: the last sync succeeded. Only then is a
    /// difference found by the next dump drift made by someone else.
    model_trusted: bool,
    /// UDP flows whose conntrack entries still have to be cleared.
    stale_flows: BTreeSet<StaleFlows>,
}

/// Stale flows kept for retrying while clearing them fails; beyond this the excess is given up
/// (the kernel expires those entries on its own, in minutes rather than at once).
const MAX_PENDING_STALE_FLOWS: usize = 4096;

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, config: ProxyConfig, masquerade: MasqueradeOptions, metrics: Metrics) -> Self {
        Syncer {
            dataplane,
            tracker: RuleTracker::new(config),
            masquerade,
            metrics,
            kernel: IpvsTable::new(),
            bound: BTreeSet::new(),
            retry: BTreeSet::new(),
            draining: BTreeSet::new(),
            needs_full: true,
            policy_ranges: Vec::new(),
            node_ports_seen: BTreeSet::new(),
            node_addresses_seen: BTreeSet::new(),
            host_addresses: None,
            sysctls_done: false,
            nft: NftSets::default(),
            nft_layout: None,
            ipv6_written: false,
            reserved_changed: true,
            model_trusted: false,
            stale_flows: BTreeSet::new(),
        }
    }

    /// The next sync compares against a fresh dump of the kernel.
    pub fn request_full(&mut self) {
        self.needs_full = true;
    }

    /// Whether the next sync will be a full one (a failure is waiting to be retried).
    #[cfg(test)]
    fn needs_full(&self) -> bool {
        self.needs_full
    }

    /// Real servers the plan dropped but that still drain; the next full sync deletes them.
    #[cfg(test)]
    fn draining(&self) -> &BTreeSet<VirtualServerKey> {
        &self.draining
    }

    /// Feeds one cluster change to the planner; the next sync applies it.
    pub fn observe(&mut self, change: Change) {
        match change {
            Change::Snapshot(snapshot) => {
                self.policy_ranges = agent_ranges(&PolicySet::compile(&snapshot.policies));
                self.tracker.load_snapshot(&snapshot);
            }
            Change::Service(s) => self.tracker.upsert_service(&*s),
            Change::ServiceDeleted { namespace, name } => self.tracker.remove_service(&namespace, &name),
            Change::Slice(s) => self.tracker.upsert_slice(&s),
            Change::SliceDeleted { namespace, name } => self.tracker.remove_slice(&namespace, &name),
            Change::Node(n) => self.tracker.set_node(&n),
            Change::Policies {
                policies,
                namespace_labels,
            } => {
                self.policy_ranges = agent_ranges(&policies);
                self.tracker.set_policies(policies, namespace_labels);
            }
        }
    }

    /// Brings the kernel in line with the rules: a full sync when one is due, else incremental.
    ///
    /// An incremental sync reads only the planner's delta: its keys' IPVS entries are diffed,
    /// their addresses bound or unbound, their set elements sent; nothing in it walks the whole
    /// plan.
    pub fn sync(&mut self) -> SyncOutcome {
        let started = Instant::now();
        let full = std::mem::take(&mut self.needs_full);
        let mut outcome = SyncOutcome {
            full,
            ..Default::default()
        };
        if full {
            self.metrics.full_syncs.inc();
        }
        if !self.sysctls_done {
            match self.dataplane.ensure_sysctls() {
                Ok(()) => self.sysctls_done = true,
                Err(e) => outcome.errors.push(e.into()),
            }
        }
        let delta = self.tracker.take_delta();
        self.reserved_changed |= delta.reserved_node_ports;
        for key in &delta.keys {
            let rule = self.tracker.winning_rule(key);
            if let Some(rule) = rule
                && rule.kind == VirtualServerKind::NodePort
            {
                self.node_ports_seen.insert(key.port);
                self.node_addresses_seen.insert(key.address);
            }
            let elements = match (rule, self.tracker.desired().get(key)) {
                (Some(rule), Some(service)) => {
                    let allowed = rule
                        .source_ranges
                        .as_deref()
                        .map(|ranges| nft::allowed_sources(key, ranges, self.tracker.node_addresses()));
                    nft::elements_of(key, reach_of(rule), service, allowed.as_deref())
                }
                _ => Vec::new(),
            };
            self.nft.set(*key, elements);
        }
        if full && let Err(e) = self.read_kernel() {
            // Without the kernel's state nothing can be compared safely: change nothing.
            outcome.errors.push(e.into());
            self.retry.extend(delta.keys);
            return self.finish(outcome, started);
        }

        // Bind new addresses first: a virtual server on an address the agent does not hold is
        // not its to program, and a cluster IP must be local before traffic to it is accepted.
        let keys: BTreeSet<VirtualServerKey> = if full {
            self.retry.clear();
            BTreeSet::new()
        } else {
            delta
                .keys
                .into_iter()
                .chain(std::mem::take(&mut self.retry))
                .collect()
        };
        let to_bind: BTreeSet<IpAddr> = if full {
            self.tracker.vips().filter(|a| !self.bound.contains(a)).collect()
        } else {
            keys.iter()
                .map(|k| k.address)
                .filter(|a| !self.bound.contains(a) && self.tracker.is_vip(a))
                .collect()
        };
        self.change_addresses(&to_bind, &BTreeSet::new(), &mut outcome);
        let ops = self.operations(full, &keys);
        self.apply(&ops, &mut outcome);
        self.track_draining(&ops, full);

        // Unbind what the rules no longer want, except addresses whose deletions failed (they
        // must stay owned until the retry deletes their virtual servers).
        let held: BTreeSet<IpAddr> = self.retry.iter().map(|k| k.address).collect();
        let to_unbind: BTreeSet<IpAddr> = if full {
            self.bound
                .iter()
                .copied()
                .filter(|a| !self.tracker.is_vip(a) && !held.contains(a))
                .collect()
        } else {
            keys.iter()
                .map(|k| k.address)
                .filter(|a| self.bound.contains(a) && !self.tracker.is_vip(a) && !held.contains(a))
                .collect()
        };
        self.change_addresses(&BTreeSet::new(), &to_unbind, &mut outcome);
        self.sync_ruleset(full, &mut outcome);
        self.sync_reserved_ports(full, &mut outcome);
        self.clear_stale_flows(&mut outcome);
        self.finish(outcome, started)
    }

    /// Replaces the model of the kernel with a dump of it, counting the owned virtual servers
    /// where the two differ as drift. (The wanted set elements follow the plan alone, never the
    /// kernel, so the full resync refills the sets from them as they are.)
    fn read_kernel(&mut self) -> Result<(), DataplaneError> {
        let table = self.dataplane.dump()?;
        let bound = self.dataplane.addresses()?;
        if self.tracker.config().mode == ProxyMode::Delegated {
            self.host_addresses = Some(Arc::new(self.dataplane.host_addresses()?));
        }
        if self.model_trusted {
            let ownership = self.ownership();
            let drifted = drifted_virtual_servers(&self.kernel, &table, &ownership);
            if drifted > 0 {
                tracing::warn!(
                    virtual_servers = drifted,
                    "the kernel's IPVS table differs from what was programmed; repairing"
                );
                self.metrics.resync_drift.inc_by(drifted as u64);
            }
        }
        self.bound = bound;
        self.kernel = table;
        Ok(())
    }

    /// Adds and removes addresses on the dummy interface; what it holds stays recorded as far
    /// as the kernel accepted (on failure the next, full, sync reads it back).
    fn change_addresses(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
        outcome: &mut SyncOutcome,
    ) {
        if add.is_empty() && remove.is_empty() {
            return;
        }
        match self.dataplane.change_addresses(add, remove) {
            Ok(()) => {
                self.bound.extend(add);
                self.bound.retain(|a| !remove.contains(a));
            }
            Err(e) => outcome.errors.push(e.into()),
        }
    }

    /// What to send the kernel: the whole owned table compared on a full sync, else only the
    /// given keys (the delta's and those to retry).
    fn operations(&self, full: bool, keys: &BTreeSet<VirtualServerKey>) -> Vec<IpvsOp> {
        let desired = self.tracker.desired();
        if full {
            return diff(&self.kernel, desired, &self.ownership());
        }
        // Ownership by bound address is checked here, without copying the bound set into an
        // Ownership on every sync; the rest of the rule is the same Ownership's.
        let others = self.ownership_beyond_bound();
        let keys: BTreeSet<VirtualServerKey> = keys
            .iter()
            .copied()
            .filter(|k| self.bound.contains(&k.address) || others.owns(k))
            .collect();
        diff_keys(&self.drain_view(&keys), desired, &keys, &Ownership::everything())
    }

    /// Applies the operations, keeping the model of the kernel in step with what it accepted
    /// and scheduling a retry (and a full sync) for what it refused.
    fn apply(&mut self, ops: &[IpvsOp], outcome: &mut SyncOutcome) {
        // What the UDP virtual servers held before, to tell which flows the batch made stale.
        let udp_before: IpvsTable = ops
            .iter()
            .map(|op| *op.service())
            .filter(|key| key.protocol == Protocol::Udp)
            .filter_map(|key| self.kernel.get(&key).map(|svc| (key, svc.clone())))
            .collect();
        let report = self.dataplane.apply(ops);
        let failed: BTreeSet<usize> = report.failures.iter().map(|(i, _)| *i).collect();
        let applied = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| !failed.contains(i))
            .map(|(_, op)| op);
        self.stale_flows.extend(stale_udp_flows(&udp_before, applied));
        for (i, op) in ops.iter().enumerate() {
            self.metrics.ipvs_operations.with_label_values(&[op.kind()]).inc();
            if failed.contains(&i) {
                self.metrics
                    .ipvs_operation_errors
                    .with_label_values(&[op.kind()])
                    .inc();
                self.retry.insert(*op.service());
            } else {
                // The kernel accepted it, so the model must accept it too.
                let _ = op.apply_to(&mut self.kernel);
            }
        }
        outcome.operations = ops.len();
        outcome.failed_operations = report.failures.len();
        if !report.succeeded() {
            // The model may be wrong where the kernel disagreed: compare against a dump next.
            self.needs_full = true;
            outcome.errors.extend(
                report
                    .failures
                    .into_iter()
                    .map(|(_, error)| SyncError::Refused(error)),
            );
        }
    }

    /// Remembers the virtual servers that still hold real servers the rules dropped.
    fn track_draining(&mut self, ops: &[IpvsOp], full: bool) {
        let desired = self.tracker.desired();
        for op in ops {
            let key = op.service();
            let drains = match (self.kernel.get(key), desired.get(key)) {
                (Some(have), Some(want)) => have
                    .real_servers
                    .keys()
                    .any(|r| !want.real_servers.contains_key(r)),
                _ => false,
            };
            if drains {
                self.draining.insert(*key);
            } else {
                self.draining.remove(key);
            }
        }
        if full {
            self.draining.retain(|k| self.kernel.contains_key(k));
        }
    }

    /// Writes the set elements that changed as one transaction; every set refilled on a full
    /// sync; the whole table when its layout changed or the last write failed.
    fn sync_ruleset(&mut self, full: bool, outcome: &mut SyncOutcome) {
        let ipv6 = self.nft.has_ipv6();
        let whole = self.nft_layout != Some(ipv6);
        let text = if whole {
            self.nft.discard_batch();
            self.nft.ruleset(&self.masquerade, self.ipv6_written)
        } else if full {
            self.nft.discard_batch();
            self.nft.refill()
        } else {
            self.nft.take_batch()
        };
        if text.is_empty() {
            return;
        }
        match self.dataplane.apply_ruleset(&text) {
            Ok(()) => {
                if whole {
                    self.nft_layout = Some(ipv6);
                    self.ipv6_written = ipv6;
                }
            }
            Err(e) => {
                self.nft_layout = None;
                outcome.errors.push(e.into());
            }
        }
    }

    /// Reserves the node ports when they changed (always on a full sync).
    fn sync_reserved_ports(&mut self, full: bool, outcome: &mut SyncOutcome) {
        if !full && !self.reserved_changed {
            return;
        }
        match self.dataplane.reserve_ports(&self.tracker.reserved_node_ports()) {
            Ok(()) => self.reserved_changed = false,
            Err(e) => {
                self.reserved_changed = true;
                outcome.errors.push(e.into());
            }
        }
    }

    /// Deletes the conntrack entries of UDP flows whose real server went (after the real server
    /// itself, so no new entry can point at it). A failure is retried on the next sync; it does
    /// not fail this one, since IPVS itself is as planned.
    fn clear_stale_flows(&mut self, outcome: &mut SyncOutcome) {
        if self.stale_flows.is_empty() {
            return;
        }
        let flows: Vec<StaleFlows> = self.stale_flows.iter().copied().collect();
        match self.dataplane.clear_flows(&flows) {
            Ok(deleted) => {
                self.metrics.conntrack_entries_deleted.inc_by(deleted as u64);
                self.stale_flows.clear();
            }
            Err(e) => {
                self.metrics.conntrack_errors.inc();
                outcome.warnings.push(e.into());
                while self.stale_flows.len() > MAX_PENDING_STALE_FLOWS {
                    self.stale_flows.pop_first();
                }
            }
        }
    }

    fn finish(&mut self, mut outcome: SyncOutcome, started: Instant) -> SyncOutcome {
        self.model_trusted = outcome.succeeded();
        for errno in outcome.errors.iter().filter_map(SyncError::errno) {
            self.metrics
                .kernel_errors
                .with_label_values(&[portpolicy_netlink::errno_name(errno)])
                .inc();
        }
        if !outcome.succeeded() {
            self.needs_full = true;
            self.metrics.sync_errors.inc();
        } else {
            self.metrics
                .last_successful_sync
                .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        self.metrics
            .virtual_servers
            .set(self.tracker.desired().len() as i64);
        self.metrics
            .real_servers
            .set(self.tracker.real_server_count() as i64);
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        outcome.health_checks = self.tracker.health_checks().cloned().collect();
        outcome
    }

    /// The model's entries for `keys`, with every TCP real server counted as connected: the
    /// model's counters are as old as the last dump, and deleting a TCP real server that has
    /// connections would cut them. So an incremental sync only sets weight 0; the next full
    /// sync, with real counters, deletes what has drained.
    fn drain_view(&self, keys: &BTreeSet<VirtualServerKey>) -> IpvsTable {
        keys.iter()
            .filter_map(|k| self.kernel.get(k).map(|svc| (*k, svc.clone())))
            .map(|(k, mut svc)| {
                if k.protocol == Protocol::Tcp {
                    for state in svc.real_servers.values_mut() {
                        state.inactive_connections = state.inactive_connections.max(1);
                    }
                }
                (k, svc)
            })
            .collect()
    }

    /// Which virtual servers the agent may touch (see [`Ownership`]).
    fn ownership(&self) -> Ownership {
        match self.tracker.config().mode {
            ProxyMode::Replacement => Ownership::everything(),
            ProxyMode::Delegated => self
                .ownership_beyond_bound()
                .with_bound_addresses(self.bound.iter().copied()),
        }
    }

    /// [`Syncer::ownership`] without the addresses bound on the dummy interface.
    fn ownership_beyond_bound(&self) -> Ownership {
        match self.tracker.config().mode {
            ProxyMode::Replacement => Ownership::everything(),
            ProxyMode::Delegated => {
                let seen = self
                    .node_ports_seen
                    .iter()
                    .filter_map(|p| PortRange::single(*p).ok());
                let ownership = Ownership::nothing().with_node_ports(
                    self.tracker
                        .node_addresses()
                        .iter()
                        .chain(&self.node_addresses_seen)
                        .copied(),
                    self.policy_ranges.iter().copied().chain(seen),
                );
                match &self.host_addresses {
                    Some(held) => ownership.with_host_addresses(Arc::clone(held)),
                    None => ownership,
                }
            }
        }
    }
}

/// How a planned virtual server is reached, for the masquerading sets.
fn reach_of(rule: &VirtualServerRule) -> Reach {
    if rule.kind.is_external() {
        Reach::External {
            local: rule.only_local,
        }
    } else {
        Reach::ClusterIp
    }
}

/// Node-port ranges of the policies whose Services the agent proxies.
fn agent_ranges(policies: &PolicySet) -> Vec<PortRange> {
    policies
        .policies()
        .iter()
        .filter(|p| p.agent_proxies)
        .filter_map(|p| p.node_port_range)
        .collect()
}

#[cfg(test)]
mod tests;
