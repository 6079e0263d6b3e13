//! What a node needs besides its IPVS table (the addresses to bind, the node ports to reserve,
//! the health checks to serve), kept in step with the desired table by the tracker, so that the
//! agent reads what changed instead of assembling [`NodeRules`](super::NodeRules) on every sync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::cidr::Cidr;

use super::model::ServiceId;
use super::rules::{HealthCheckRule, VirtualServerKind, VirtualServerRule};
use super::service_rules::ServiceRules;
use super::table::{IpvsService, VirtualServerKey};

/// Counts per value: a value is wanted while anything still wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Counted<T: Ord>(BTreeMap<T, usize>);

impl<T: Ord> Default for Counted<T> {
    fn default() -> Self {
        Counted(BTreeMap::new())
    }
}

impl<T: Ord + Copy> Counted<T> {
    /// Returns whether `value` became wanted.
    fn add(&mut self, value: T) -> bool {
        let count = self.0.entry(value).or_default();
        *count += 1;
        *count == 1
    }

    /// Returns whether `value` stopped being wanted.
    fn remove(&mut self, value: T) -> bool {
        match self.0.get_mut(&value) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.0.remove(&value);
                true
            }
            None => false,
        }
    }

    fn contains(&self, value: &T) -> bool {
        self.0.contains_key(value)
    }
}

/// What decides how a virtual server is reached beyond its IPVS entry (which addresses the
/// node binds, which traffic the agent's nftables rules mark): a change of it alone dirties the
/// key. That includes a load balancer's source ranges, which only the agent's nftables sets
/// carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Reach {
    kind: VirtualServerKind,
    only_local: bool,
    source_ranges: Option<Arc<[Cidr]>>,
}

impl Reach {
    pub(super) fn of(rule: &VirtualServerRule) -> Self {
        Reach {
            kind: rule.kind,
            only_local: rule.only_local,
            source_ranges: rule.source_ranges.clone(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct NodeState {
    /// How each desired virtual server is reached, as the Service that wins it plans it.
    reaches: HashMap<VirtualServerKey, Reach>,
    /// Addresses of desired virtual servers that are not node ports: what the dummy interface
    /// binds.
    vips: Counted<IpAddr>,
    /// Node ports and health-check node ports of every proxied Service (contested or not).
    reserved: Counted<u16>,
    health_checks: BTreeMap<ServiceId, HealthCheckRule>,
    real_servers: usize,
    reserved_changed: bool,
    health_checks_changed: bool,
}

impl NodeState {
    /// A desired entry changed from `old` to `new` (either may be absent).
    pub(super) fn entry_changed(
        &mut self,
        key: &VirtualServerKey,
        old: Option<&IpvsService>,
        new: Option<(Reach, &IpvsService)>,
    ) {
        if let Some(old) = old {
            self.real_servers -= old.real_servers.len();
            if let Some(reach) = self.reaches.remove(key)
                && reach.kind != VirtualServerKind::NodePort
            {
                self.vips.remove(key.address);
            }
        }
        if let Some((reach, new)) = new {
            self.real_servers += new.real_servers.len();
            if reach.kind != VirtualServerKind::NodePort {
                self.vips.add(key.address);
            }
            self.reaches.insert(*key, reach);
        }
    }

    /// A Service's rules changed from `old` to `new` (either may be absent).
    pub(super) fn service_changed(
        &mut self,
        id: &ServiceId,
        old: Option<&ServiceRules>,
        new: Option<&ServiceRules>,
    ) {
        for port in old.iter().flat_map(|rules| rules.node_ports.iter()) {
            self.reserved_changed |= self.reserved.remove(*port);
        }
        for port in new.iter().flat_map(|rules| rules.node_ports.iter()) {
            self.reserved_changed |= self.reserved.add(*port);
        }
        let check = new.and_then(|rules| rules.health_check.as_ref());
        if self.health_checks.get(id) != check {
            self.health_checks_changed = true;
            match check {
                Some(check) => self.health_checks.insert(id.clone(), check.clone()),
                None => self.health_checks.remove(id),
            };
        }
    }

    /// Replaces everything at once (a re-list), noting what differs from before; returns the
    /// keys whose reach changed (the caller compares the IPVS entries).
    pub(super) fn rebuild<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (VirtualServerKey, Reach, &'a IpvsService)>,
        services: impl IntoIterator<Item = (&'a ServiceId, &'a ServiceRules)>,
    ) -> Vec<VirtualServerKey> {
        let mut fresh = NodeState::default();
        for (key, reach, service) in entries {
            fresh.entry_changed(&key, None, Some((reach, service)));
        }
        for (id, rules) in services {
            fresh.service_changed(id, None, Some(rules));
        }
        fresh.reserved_changed = self.reserved_changed || fresh.reserved.0.keys().ne(self.reserved.0.keys());
        fresh.health_checks_changed = self.health_checks_changed || fresh.health_checks != self.health_checks;
        // Keys present on one side only are in the caller's table comparison already.
        let changed = fresh
            .reaches
            .iter()
            .filter(|(key, reach)| self.reaches.get(key).is_some_and(|old| old != *reach))
            .map(|(key, _)| *key)
            .collect();
        *self = fresh;
        changed
    }

    pub(super) fn is_vip(&self, address: &IpAddr) -> bool {
        self.vips.contains(address)
    }

    pub(super) fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vips.0.keys().copied()
    }

    pub(super) fn reach(&self, key: &VirtualServerKey) -> Option<&Reach> {
        self.reaches.get(key)
    }

    pub(super) fn reserved_node_ports(&self) -> BTreeSet<u16> {
        self.reserved.0.keys().copied().collect()
    }

    pub(super) fn health_checks(&self) -> impl Iterator<Item = &HealthCheckRule> {
        self.health_checks.values()
    }

    pub(super) fn real_server_count(&self) -> usize {
        self.real_servers
    }

    /// Whether the reserved node ports and the health checks changed since the last call.
    pub(super) fn take_changes(&mut self) -> (bool, bool) {
        (
            std::mem::take(&mut self.reserved_changed),
            std::mem::take(&mut self.health_checks_changed),
        )
    }
}
