//! The nodePort allocator as state kept between events, for the admission webhook.
//!
//! [`allocate_node_ports`](super::allocate_node_ports) decides the whole cluster from scratch,
//! which is right for a reconcile but too slow to run once per admission review at 10,000
//! Services. [`AdmissionLedger`] keeps what a review needs, updated one watch event at a time:
//! which ports Services hold (with a count, so duplicates are released correctly), which ports
//! the policies block (reserved ranges, pins, sticky records), and the ports handed out by
//! reviews whose Services the watch has not shown yet. A review then costs the Service's own
//! ports plus a bitmap scan, and never gives a port to two reviews: every port it hands out is
//! held as a pending reservation until the Service appears holding it, or the reservation times
//! out (the create failed, or was a dry run of another client).
//!
//! It picks ports the way the allocator does (the policy's pin, else the identity's retained
//! record, else the first free port from where the identity's hash points, upper band first),
//! so a Service gets at admission the port a reconcile would have given it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};

use super::PortBitmap;
use super::allocator::{Identity, first_free, identity_hash, port_groups};
use crate::crd::{CompiledPolicy, NodePortKind, PortPolicy};
use crate::governance::{Governance, NamespaceLabels, PolicySet};
use crate::ports::{PortRange, Protocol};
use crate::service::{HealthCheckField, ServiceModel};
use crate::well_known::HEALTH_CHECK_NODE_PORT_ANNOTATION;

/// A Service by namespace and name.
type ServiceKey = (String, String);

/// A sticky record's owner: (policy, namespace, service, port name, kind).
type RecordKey = (String, String, String, String, NodePortKind);

/// What a review is asked about.
#[derive(Clone, Copy, Debug)]
pub struct ServiceReview<'a> {
    /// The Service as it is to be stored. Its namespace must be set (an admission request
    /// carries it beside the object).
    pub service: &'a Service,
    /// The stored Service, for an UPDATE: the API server keeps the nodePorts an update leaves
    /// out, so those ports need none.
    pub old: Option<&'a Service>,
    /// The review's uid: names the reservation of a Service whose name the API server has not
    /// generated yet (`metadata.generateName`).
    pub uid: &'a str,
    /// A dry run is answered as a real request would be, and reserves nothing.
    pub dry_run: bool,
}

/// The answer to a review: what to patch, and why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceAdmission {
    /// RFC 6902 operations setting the missing nodePorts; empty when nothing is set.
    pub patch: Vec<Value>,
    /// The ports set, by field (`spec.ports[0].nodePort`, `spec.healthCheckNodePort`).
    pub assigned: Vec<(String, u16)>,
    /// The policy that governs the Service, if one with a nodePort range does.
    pub policy: Option<String>,
    /// Why nothing (or not everything) was set; shown to the client as admission warnings.
    pub warnings: Vec<String>,
}

/// Ports handed out by one review, held until the Service shows them or `expires`.
#[derive(Clone, Debug)]
struct Pending {
    ports: Vec<u16>,
    expires: DateTime<Utc>,
}

/// The policies as the ledger reads them (pins, reserved ranges, live records), compiled
/// without the ledger, so that a policy event costs the review path only the swap.
#[derive(Clone, Debug)]
pub struct LedgerPolicies {
    cluster_range: PortRange,
    policies: PolicySet,
    policy_blocked: PortBitmap,
    records: HashMap<RecordKey, u16>,
    pins: HashMap<(String, String, String, String), u16>,
    pinned_for: HashMap<u16, (String, String, String)>,
}

impl LedgerPolicies {
    /// Compiles `policies` for a ledger over `cluster_range`; records whose retention ended
    /// by `now` no longer block.
    pub fn compile<'p>(
        policies: impl IntoIterator<Item = &'p PortPolicy> + Clone,
        cluster_range: PortRange,
        now: DateTime<Utc>,
    ) -> Self {
        let compiled_set = PolicySet::compile(policies.clone());
        let mut out = LedgerPolicies {
            cluster_range,
            policies: PolicySet::default(),
            policy_blocked: PortBitmap::new(cluster_range),
            records: HashMap::new(),
            pins: HashMap::new(),
            pinned_for: HashMap::new(),
        };
        let now_seconds = now.timestamp();
        for compiled in compiled_set.policies() {
            for reserved in &compiled.reserved {
                for port in reserved.low..=reserved.high {
                    out.policy_blocked.set(port);
                }
            }
            for pin in &compiled.pinned {
                let Ok(port) = u16::try_from(pin.node_port) else {
                    continue;
                };
                out.policy_blocked.set(port);
                let owner = (pin.namespace.clone(), pin.service.clone(), pin.port_name.clone());
                out.pins.insert(
                    (
                        compiled.name.clone(),
                        owner.0.clone(),
                        owner.1.clone(),
                        owner.2.clone(),
                    ),
                    port,
                );
                out.pinned_for.insert(port, owner);
            }
        }
        for policy in policies {
            let name = policy.name();
            let valid = compiled_set.get(name);
            let invalid = compiled_set.invalid().iter().any(|n| n == name);
            let Some(status) = &policy.status else { continue };
            for record in &status.allocations {
                let Ok(port) = u16::try_from(record.node_port) else {
                    continue;
                };
                if port == 0 {
                    continue;
                }
                if invalid {
                    // Kept as it is, so fixing the spec loses nothing (as the allocator does).
                    out.policy_blocked.set(port);
                    continue;
                }
                let Some(valid) = valid else { continue };
                let expired = record
                    .released_at
                    .as_ref()
                    .is_some_and(|t| t.0.as_second() + valid.retention_seconds <= now_seconds);
                if expired {
                    continue;
                }
                out.policy_blocked.set(port);
                let key = (
                    name.to_string(),
                    record.namespace.clone(),
                    record.service.clone(),
                    record.port_name.clone(),
                    record.kind,
                );
                out.records.insert(key, port);
            }
        }
        out.policies = compiled_set;
        out
    }
}

/// What a review and the allocator agree on, kept up to date one event at a time.
#[derive(Clone, Debug)]
pub struct AdmissionLedger {
    cluster_range: PortRange,
    reservation_timeout: chrono::Duration,
    policies: PolicySet,
    namespace_labels: NamespaceLabels,
    /// The nodePorts each known Service holds (its ports and health check).
    services: HashMap<ServiceKey, Vec<u16>>,
    /// How many Services hold each port (two may, in a broken cluster).
    service_holds: HashMap<u16, u32>,
    /// Ports the policies keep from automatic allocation: reserved ranges, pins, sticky
    /// records (live or retained), and records of invalid policies.
    policy_blocked: PortBitmap,
    /// Each identity's unexpired record, to give back to it.
    records: HashMap<RecordKey, u16>,
    /// Pins by (policy, namespace, service, port name).
    pins: HashMap<(String, String, String, String), u16>,
    /// Who each pinned port is pinned for: (namespace, service, port name).
    pinned_for: HashMap<u16, (String, String, String)>,
    /// Reservations of reviews, by Service (or by review uid for a generated name).
    pending: BTreeMap<ServiceKey, Pending>,
    pending_ports: HashMap<u16, ServiceKey>,
    /// The union of all of the above: what automatic allocation must skip.
    blocked: PortBitmap,
}

impl AdmissionLedger {
    /// An empty ledger: no policies, no Services, no reservations.
    pub fn new(cluster_range: PortRange, reservation_timeout: std::time::Duration) -> Self {
        AdmissionLedger {
            cluster_range,
            reservation_timeout: chrono::Duration::from_std(reservation_timeout)
                .unwrap_or(chrono::Duration::MAX),
            policies: PolicySet::default(),
            namespace_labels: NamespaceLabels::default(),
            services: HashMap::new(),
            service_holds: HashMap::new(),
            policy_blocked: PortBitmap::new(cluster_range),
            records: HashMap::new(),
            pins: HashMap::new(),
            pinned_for: HashMap::new(),
            pending: BTreeMap::new(),
            pending_ports: HashMap::new(),
            blocked: PortBitmap::new(cluster_range),
        }
    }

    /// Replaces the policies (on any PortPolicy event: their specs and `status.allocations`).
    /// Services and reservations stay. Records whose retention ended by `now` no longer block.
    pub fn set_policies<'p>(
        &mut self,
        policies: impl IntoIterator<Item = &'p PortPolicy> + Clone,
        now: DateTime<Utc>,
    ) {
        self.install_policies(LedgerPolicies::compile(policies, self.cluster_range, now));
    }

    /// Replaces the policies with ones compiled beforehand, outside whatever lock guards the
    /// ledger: all that is left here is the swap and rebuilding the blocked ports.
    pub fn install_policies(&mut self, compiled: LedgerPolicies) {
        let LedgerPolicies {
            cluster_range,
            policies,
            policy_blocked,
            records,
            pins,
            pinned_for,
        } = compiled;
        if cluster_range != self.cluster_range {
            // Compiled for a ledger over another range (a caller's mistake): never mix ranges.
            debug_assert!(
                false,
                "policies compiled for {cluster_range}, not {}",
                self.cluster_range
            );
            return;
        }
        self.policies = policies;
        self.policy_blocked = policy_blocked;
        self.records = records;
        self.pins = pins;
        self.pinned_for = pinned_for;
        self.rebuild_blocked();
    }

    /// Replaces what namespace selectors see.
    pub fn set_namespaces(&mut self, namespace_labels: NamespaceLabels) {
        self.namespace_labels = namespace_labels;
    }

    /// A Service was added or changed (a watch event). A reservation for it ends where the
    /// Service now holds the reserved port; a port it does not hold stays reserved until the
    /// reservation times out (the event may predate the write the review was for).
    pub fn upsert_service(&mut self, service: &Service) {
        let model = ServiceModel::read(service);
        let key = (model.namespace.to_string(), model.name.to_string());
        let held: Vec<u16> = model.held_node_ports().map(|(port, _)| port).collect();
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.ports.retain(|p| !held.contains(p));
            let confirmed = pending.ports.is_empty();
            if confirmed {
                self.pending.remove(&key);
            }
            for port in &held {
                if self.pending_ports.get(port) == Some(&key) {
                    self.pending_ports.remove(port);
                }
            }
        }
        let before = self.services.insert(key, held.clone()).unwrap_or_default();
        for &port in &held {
            *self.service_holds.entry(port).or_default() += 1;
            self.blocked.set(port);
        }
        for port in before {
            self.release_hold(port);
        }
    }

    /// A Service was deleted (a watch event).
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        if let Some(before) = self.services.remove(&(namespace.to_string(), name.to_string())) {
            for port in before {
                self.release_hold(port);
            }
        }
    }

    /// Drops every Service (a watch re-list starts over).
    pub fn clear_services(&mut self) {
        self.services.clear();
        self.service_holds.clear();
        self.rebuild_blocked();
    }

    /// Releases the reservations that timed out by `now`; returns how many.
    pub fn expire(&mut self, now: DateTime<Utc>) -> usize {
        let expired: Vec<ServiceKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &expired {
            self.release_pending(key);
        }
        expired.len()
    }

    /// The ports of those reservations, sorted: what the reconcile must not hand out either.
    pub fn in_flight_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.pending_ports.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    /// The cluster's nodePort range, which [`LedgerPolicies::compile`] needs.
    pub fn cluster_range(&self) -> PortRange {
        self.cluster_range
    }

    /// Reservations not yet confirmed by the watch nor timed out.
    pub fn pending_reservations(&self) -> usize {
        self.pending.len()
    }

    /// Services known to the ledger.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Answers a review of a Service CREATE or UPDATE.
    pub fn review(&mut self, review: &ServiceReview<'_>, now: DateTime<Utc>) -> ServiceAdmission {
        self.expire(now);
        let mut named;
        let service = match review.service.metadata.name.as_deref() {
            Some(name) if !name.is_empty() => review.service,
            _ => {
                // The API server generates the name after admission: the review's uid stands in.
                named = review.service.clone();
                let prefix = named.metadata.generate_name.clone().unwrap_or_default();
                named.metadata.name = Some(format!("{prefix}{}", review.uid));
                &named
            }
        };
        let model = ServiceModel::read(service);
        let key = (model.namespace.to_string(), model.name.to_string());
        let mut out = ServiceAdmission::default();
        if !model.type_.has_node_ports() {
            return out;
        }
        let ns_labels = self.namespace_labels.of(model.namespace).into_owned();
        let policy = match self.policies.governing_service(Some(&ns_labels), model.labels) {
            Governance::Ungoverned => return out,
            Governance::Ambiguous(a, b) => {
                out.warnings.push(format!(
                    "{} is selected by PortPolicy/{} and PortPolicy/{}: neither assigns its nodePorts",
                    model.object(),
                    a.name,
                    b.name
                ));
                return out;
            }
            Governance::By(policy) => policy.clone(),
        };
        let Some(range) = policy.node_port_range else {
            return out;
        };
        out.policy = Some(policy.name.clone());
        if let Some(issue) = model.issues.iter().find(|i| i.kind.blocks_allocation()) {
            out.warnings.push(format!(
                "{}; no nodePort assigned by PortPolicy/{}",
                model.problem(issue, None),
                policy.name
            ));
            return out;
        }
        // A repeated review of the same Service (the API server may call a webhook again)
        // gets its ports afresh from the same start, so the same ports.
        self.release_pending(&key);

        let old = review.old.map(ServiceModel::read);
        let carried = |port: u16, protocol: Protocol| {
            old.as_ref()?
                .ports
                .iter()
                .find(|p| p.port == port && p.protocol == protocol)?
                .node_port
        };
        let mut reserved = Vec::new();
        if model.allocates_node_ports {
            for group in port_groups(&model.ports) {
                let missing: Vec<_> = group
                    .iter()
                    .filter(|p| p.node_port.is_none() && carried(p.port, p.protocol).is_none())
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                let names: Vec<&str> = group.iter().map(|p| p.name).collect();
                let shared = group
                    .iter()
                    .find_map(|p| p.node_port.or_else(|| carried(p.port, p.protocol)));
                let field = format!("spec.ports[{}].nodePort", missing[0].index);
                let port = match shared {
                    Some(port) => Some(port),
                    None => self.choose(&key, &policy, range, &names, NodePortKind::Service),
                };
                let Some(port) = port else {
                    out.warnings.push(self.exhausted(&model, &policy, range, &field));
                    continue;
                };
                if shared.is_none() {
                    reserved.push(port);
                    self.hold_pending(&key, port);
                }
                for member in missing {
                    out.patch.push(json!({"op": "add", "path": format!("/spec/ports/{}/nodePort", member.index), "value": port}));
                    out.assigned
                        .push((format!("spec.ports[{}].nodePort", member.index), port));
                }
            }
        }
        if let Some(health) = model.health_check
            && health.node_port.is_none()
            && old
                .as_ref()
                .and_then(|o| o.health_check)
                .and_then(|h| h.node_port)
                .is_none()
        {
            let field = health.field.path();
            match self.choose(&key, &policy, range, &[""], NodePortKind::HealthCheck) {
                Some(port) => {
                    reserved.push(port);
                    self.hold_pending(&key, port);
                    out.patch.push(match health.field {
                        HealthCheckField::Spec => {
                            json!({"op": "add", "path": "/spec/healthCheckNodePort", "value": port})
                        }
                        HealthCheckField::Annotation => json!({"op": "add",
                            "path": format!("/metadata/annotations/{}", HEALTH_CHECK_NODE_PORT_ANNOTATION.replace('/', "~1")),
                            "value": port.to_string()}),
                    });
                    out.assigned.push((field, port));
                }
                None => out.warnings.push(self.exhausted(&model, &policy, range, &field)),
            }
        }
        if review.dry_run {
            self.release_pending(&key);
        } else if !reserved.is_empty() {
            self.pending.insert(
                key,
                Pending {
                    ports: reserved,
                    expires: now + self.reservation_timeout,
                },
            );
        }
        out
    }

    /// The port for an identity of Service `key`: its pin, else its record, else a free one.
    fn choose(
        &self,
        key: &ServiceKey,
        policy: &CompiledPolicy,
        range: PortRange,
        names: &[&str],
        kind: NodePortKind,
    ) -> Option<u16> {
        let (namespace, service) = (key.0.as_str(), key.1.as_str());
        if kind == NodePortKind::Service {
            let pin = names.iter().find_map(|name| {
                self.pins.get(&(
                    policy.name.clone(),
                    namespace.to_string(),
                    service.to_string(),
                    name.to_string(),
                ))
            });
            if let Some(&pin) = pin
                && !self.held_by_other(pin, key)
            {
                return Some(pin);
            }
        }
        let cluster = self.cluster_range;
        // As the allocator: a record is only a promise, so one on a port reserved since is not
        // given back.
        let reserved = |port: u16| {
            self.policies
                .policies()
                .iter()
                .any(|p| p.reserved.iter().any(|r| r.contains(port)))
        };
        let restorable = |port: u16| {
            range.contains(port)
                && cluster.contains(port)
                && !reserved(port)
                && !self.held_by_other(port, key)
                && self.pinned_for.get(&port).is_none_or(|(ns, svc, name)| {
                    kind == NodePortKind::Service
                        && ns == namespace
                        && svc == service
                        && names.contains(&name.as_str())
                })
        };
        let restored = names.iter().find_map(|name| {
            let record = (
                policy.name.clone(),
                namespace.to_string(),
                service.to_string(),
                name.to_string(),
                kind,
            );
            self.records.get(&record).copied().filter(|&p| restorable(p))
        });
        if restored.is_some() {
            return restored;
        }
        let usable = range.overlaps(&cluster).then(|| PortRange {
            low: range.low.max(cluster.low),
            high: range.high.min(cluster.high),
        })?;
        let identity = Identity {
            namespace,
            service,
            port_name: names[0],
            kind,
        };
        first_free(&self.blocked, usable, identity_hash(&identity))
    }

    fn exhausted(
        &self,
        model: &ServiceModel<'_>,
        policy: &CompiledPolicy,
        range: PortRange,
        field: &str,
    ) -> String {
        format!(
            "{} {field}: no free nodePort in PortPolicy/{}'s range {range}; left to the API server and the operator",
            model.object(),
            policy.name
        )
    }

    /// Whether a Service other than `key`, or another review, holds `port`.
    fn held_by_other(&self, port: u16, key: &ServiceKey) -> bool {
        let own = self.services.get(key).is_some_and(|held| held.contains(&port));
        let holders = self.service_holds.get(&port).copied().unwrap_or(0);
        holders > u32::from(own) || self.pending_ports.get(&port).is_some_and(|k| k != key)
    }

    fn hold_pending(&mut self, key: &ServiceKey, port: u16) {
        self.pending_ports.insert(port, key.clone());
        self.blocked.set(port);
    }

    fn release_pending(&mut self, key: &ServiceKey) {
        if let Some(pending) = self.pending.remove(key) {
            for port in pending.ports {
                if self.pending_ports.get(&port) == Some(key) {
                    self.pending_ports.remove(&port);
                }
                self.refresh(port);
            }
        }
        // Ports held for the review in progress, before it recorded its reservation.
        let stray: Vec<u16> = (self.pending_ports.iter())
            .filter(|(_, k)| *k == key)
            .map(|(p, _)| *p)
            .collect();
        for port in stray {
            self.pending_ports.remove(&port);
            self.refresh(port);
        }
    }

    fn release_hold(&mut self, port: u16) {
        if let Some(count) = self.service_holds.get_mut(&port) {
            *count -= 1;
            if *count == 0 {
                self.service_holds.remove(&port);
            }
        }
        self.refresh(port);
    }

    fn refresh(&mut self, port: u16) {
        let held = self.service_holds.contains_key(&port)
            || self.pending_ports.contains_key(&port)
            || self.policy_blocked.test(port);
        if held {
            self.blocked.set(port);
        } else {
            self.blocked.clear(port);
        }
    }

    fn rebuild_blocked(&mut self) {
        self.blocked = self.policy_blocked.clone();
        for port in self.service_holds.keys().chain(self.pending_ports.keys()) {
            self.blocked.set(*port);
        }
    }
}

#[cfg(test)]
mod tests;
