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
use std::time::Instant;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::dataplane::{Dataplane, DataplaneError};
use super::metrics::Metrics;
use super::nft::{self, MasqueradeOptions, Reach};
use portpolicy_core::governance::{NamespaceLabels, PolicySet};
use portpolicy_core::ipvs::diff::{Ownership, diff, diff_keys};
use portpolicy_core::ipvs::{
    HealthCheckRule, NodeRules, ProxyConfig, ProxyMode, RuleTracker, StaleFlows, VirtualServerKind,
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
    sysctls_done: bool,
    last_ruleset: Option<String>,
    last_reserved: Option<BTreeSet<u16>>,
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
            sysctls_done: false,
            last_ruleset: None,
            last_reserved: None,
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
        let rules = self.tracker.node_rules();
        self.node_ports_seen.extend(
            rules
                .virtual_servers
                .iter()
                .filter(|vs| vs.kind == VirtualServerKind::NodePort)
                .map(|vs| vs.key.port),
        );
        let dirty = self.tracker.take_dirty();
        if full && let Err(e) = self.read_kernel(&rules) {
            // Without the kernel's state nothing can be compared safely: change nothing.
            outcome.errors.push(e.into());
            self.retry.extend(dirty);
            return self.finish(outcome, started, &rules);
        }

        // Bind new addresses first: a virtual server on an address the agent does not hold is
        // not its to program, and a cluster IP must be local before traffic to it is accepted.
        let wanted: BTreeSet<IpAddr> = self.bound.union(&rules.vips).copied().collect();
        self.bind(wanted, &mut outcome);
        let ops = self.operations(full, dirty, &rules);
        self.apply(&ops, &mut outcome);
        self.track_draining(&ops, full);

        // Unbind what the rules no longer want, except addresses whose deletions failed (they
        // must stay owned until the retry deletes their virtual servers).
        let mut keep: BTreeSet<IpAddr> = rules.vips.clone();
        keep.extend(
            self.retry
                .iter()
                .map(|k| k.address)
                .filter(|a| self.bound.contains(a)),
        );
        self.bind(keep, &mut outcome);
        self.sync_ruleset(&rules, full, &mut outcome);
        self.sync_reserved_ports(&rules, full, &mut outcome);
        self.clear_stale_flows(&mut outcome);
        self.finish(outcome, started, &rules)
    }

    /// Replaces the model of the kernel with a dump of it, counting the owned virtual servers
    /// where the two differ as drift.
    fn read_kernel(&mut self, rules: &NodeRules) -> Result<(), DataplaneError> {
        let table = self.dataplane.dump()?;
        let bound = self.dataplane.addresses()?;
        if self.model_trusted {
            let ownership = self.ownership(rules, &self.bound);
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

    /// Makes the dummy interface hold `addresses`; on failure what it held stays recorded.
    fn bind(&mut self, addresses: BTreeSet<IpAddr>, outcome: &mut SyncOutcome) {
        if addresses == self.bound {
            return;
        }
        match self.dataplane.sync_addresses(&addresses) {
            Ok(()) => self.bound = addresses,
            Err(e) => outcome.errors.push(e.into()),
        }
    }

    /// What to send the kernel: the whole owned table compared on a full sync, else only the
    /// dirty keys and those to retry.
    fn operations(
        &mut self,
        full: bool,
        dirty: BTreeSet<VirtualServerKey>,
        rules: &NodeRules,
    ) -> Vec<IpvsOp> {
        let ownership = self.ownership(rules, &self.bound);
        let desired = self.tracker.desired();
        if full {
            self.retry.clear();
            return diff(&self.kernel, desired, &ownership);
        }
        let keys: BTreeSet<VirtualServerKey> =
            dirty.into_iter().chain(std::mem::take(&mut self.retry)).collect();
        diff_keys(&self.drain_view(&keys), desired, &keys, &ownership)
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

    /// Applies the masquerading ruleset when it changed (always on a full sync).
    fn sync_ruleset(&mut self, rules: &NodeRules, full: bool, outcome: &mut SyncOutcome) {
        let ruleset = nft::ruleset(
            rules.virtual_servers.iter().map(|vs| {
                let reach = if vs.kind.is_external() {
                    Reach::External { local: vs.only_local }
                } else {
                    Reach::ClusterIp
                };
                (&vs.key, reach)
            }),
            self.tracker.desired(),
            &self.masquerade,
            &nft::source_restrictions(rules),
        );
        if !full && self.last_ruleset.as_ref() == Some(&ruleset) {
            return;
        }
        match self.dataplane.apply_ruleset(&ruleset) {
            Ok(()) => self.last_ruleset = Some(ruleset),
            Err(e) => {
                self.last_ruleset = None;
                outcome.errors.push(e.into());
            }
        }
    }

    /// Reserves the node ports when they changed (always on a full sync).
    fn sync_reserved_ports(&mut self, rules: &NodeRules, full: bool, outcome: &mut SyncOutcome) {
        if !full && self.last_reserved.as_ref() == Some(&rules.reserved_node_ports) {
            return;
        }
        match self.dataplane.reserve_ports(&rules.reserved_node_ports) {
            Ok(()) => self.last_reserved = Some(rules.reserved_node_ports.clone()),
            Err(e) => {
                self.last_reserved = None;
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

    fn finish(&mut self, mut outcome: SyncOutcome, started: Instant, rules: &NodeRules) -> SyncOutcome {
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
            .set(rules.virtual_servers.len() as i64);
        self.metrics.real_servers.set(
            rules
                .virtual_servers
                .iter()
                .map(|vs| vs.real_servers.len() as i64)
                .sum(),
        );
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        outcome.health_checks = rules.health_checks.clone();
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

    fn ownership(&self, rules: &NodeRules, bound: &BTreeSet<IpAddr>) -> Ownership {
        match self.tracker.config().mode {
            ProxyMode::Replacement => Ownership::everything(),
            ProxyMode::Delegated => {
                let seen = self
                    .node_ports_seen
                    .iter()
                    .filter_map(|p| PortRange::single(*p).ok());
                Ownership::nothing()
                    .with_bound_addresses(bound.iter().copied())
                    .with_node_ports(
                        rules.node_addresses.iter().copied(),
                        self.policy_ranges.iter().copied().chain(seen),
                    )
            }
        }
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
