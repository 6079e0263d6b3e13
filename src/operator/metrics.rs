//! Prometheus metrics of the operator. Label values are bounded: error kinds and watched
//! resources are fixed sets, initialised to zero so every series exists from the start (a
//! rate() or an alert on a series that appears only with its first error sees nothing), and
//! policy names are as many as the cluster has PortPolicies (removed when a policy is deleted).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::Error;
use super::core::NodePortCounts;

/// The watches the operator runs, as the `resource` label of `watch_errors_total` names them.
pub const WATCHED_RESOURCES: [&str; 6] = [
    "portpolicies",
    "services",
    "pods",
    "namespaces",
    "daemonsets",
    "nodes",
];

/// The `outcome` label values of `webhook_reviews_total`.
pub const WEBHOOK_OUTCOMES: [&str; 4] = ["patched", "unchanged", "not_leader", "invalid"];
/// What happened to one nodePort of a governed Service, as the `outcome` label of
/// `node_port_allocations_total` names it: given a new port from the range (`allocated`), its
/// retained one back (`restored`), the port the policy pins for it (`pinned`), a port in the
/// range in place of the one it held outside (`moved`), or no port because the range is full,
/// its pinned port is taken or the API server rejected the write (`refused`).
pub const ALLOCATION_OUTCOMES: [&str; 5] = ["allocated", "restored", "pinned", "moved", "refused"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub node_ports_used: IntGaugeVec,
    pub node_ports_free: IntGaugeVec,
    pub node_ports_reserved: IntGaugeVec,
    pub node_ports_pinned: IntGaugeVec,
    pub conflicts: IntGaugeVec,
    pub watch_errors: IntCounterVec,
    pub unreadable_policies: IntGauge,
    pub leader: IntGauge,
    pub webhook_reviews: IntCounterVec,
    pub webhook_review_duration: Histogram,
    pub webhook_reservations: IntGauge,
    pub allocations: IntCounterVec,
    /// Per policy, the refusals last seen, so a refusal repeated by every reconcile (a full
    /// range stays full) is counted once, when it first appears.
    refusals: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge_per_policy(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["policy"]).expect("a valid metric definition")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("portpolicy_operator".into()), None)
            .expect("a fixed, valid metric prefix");
        let reconciles = IntCounter::new("reconciliations_total", "Reconciliations started").unwrap();
        let failures = IntCounterVec::new(
            Opts::new(
                "reconciliation_errors_total",
                "Reconciliations that failed, by error kind",
            ),
            &["kind"],
        )
        .unwrap();
        for kind in Error::METRIC_LABELS {
            failures.with_label_values(&[kind]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconciliation took")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .unwrap();
        let node_ports_used = gauge_per_policy(
            "node_ports_used",
            "nodePorts of a policy's range it holds, released-but-retained included",
        );
        let node_ports_free = gauge_per_policy(
            "node_ports_free",
            "nodePorts of a policy's range it can still hand out: neither used, reserved nor pinned",
        );
        let node_ports_reserved = gauge_per_policy(
            "node_ports_reserved",
            "nodePorts of a policy's range in spec.nodePorts.reserved and not used",
        );
        let node_ports_pinned = gauge_per_policy(
            "node_ports_pinned",
            "nodePorts of a policy's range pinned to a Service that does not hold them now",
        );
        let conflicts = gauge_per_policy("host_port_conflicts", "hostPort conflicts a policy reports");
        let watch_errors = IntCounterVec::new(
            Opts::new("watch_errors_total", "Errors of the watches, by watched kind"),
            &["resource"],
        )
        .unwrap();
        for resource in WATCHED_RESOURCES {
            watch_errors.with_label_values(&[resource]);
        }
        let unreadable_policies = IntGauge::new(
            "unreadable_policies",
            "PortPolicies that cannot be read (a field of the wrong type) and so are not reconciled",
        )
        .unwrap();
        let leader = IntGauge::new("leader", "1 while this replica leads and may write, else 0").unwrap();
        let webhook_reviews = IntCounterVec::new(
            Opts::new(
                "webhook_reviews_total",
                "Admission reviews answered, by outcome (patched, unchanged, not_leader, invalid)",
            ),
            &["outcome"],
        )
        .unwrap();
        for outcome in WEBHOOK_OUTCOMES {
            webhook_reviews.with_label_values(&[outcome]);
        }
        // The API server gives the webhook 2 s (config/webhook.yaml); the bench answers in
        // microseconds, so the buckets resolve both the normal case and a stall near the timeout.
        let webhook_review_duration = Histogram::with_opts(
            HistogramOpts::new(
                "webhook_review_duration_seconds",
                "Time the webhook took to answer one admission review, from its body to its answer",
            )
            .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0]),
        )
        .unwrap();
        let webhook_reservations = IntGauge::new(
            "webhook_reservations",
            "nodePorts handed out by admission reviews whose Services the watch has not shown yet",
        )
        .unwrap();
        let allocations = IntCounterVec::new(
            Opts::new(
                "node_port_allocations_total",
                "nodePorts written to governed Services (or refused them), by policy and outcome",
            ),
            &["policy", "outcome"],
        )
        .unwrap();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(node_ports_used.clone()),
            Box::new(node_ports_free.clone()),
            Box::new(node_ports_reserved.clone()),
            Box::new(node_ports_pinned.clone()),
            Box::new(conflicts.clone()),
            Box::new(webhook_reviews.clone()),
            Box::new(webhook_review_duration.clone()),
            Box::new(webhook_reservations.clone()),
            Box::new(watch_errors.clone()),
            Box::new(unreadable_policies.clone()),
            Box::new(leader.clone()),
            Box::new(allocations.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            node_ports_used,
            node_ports_free,
            node_ports_reserved,
            node_ports_pinned,
            conflicts,
            watch_errors,
            unreadable_policies,
            leader,
            webhook_reviews,
            webhook_review_duration,
            webhook_reservations,
            allocations,
            refusals: Arc::default(),
        }
    }

    /// Counts one nodePort outcome (one of [`ALLOCATION_OUTCOMES`]).
    pub fn count_allocation(&self, policy: &str, outcome: &str) {
        self.allocations.with_label_values(&[policy, outcome]).inc();
    }

    /// Replaces the refusals `policy` has now, counting those that were not there before.
    pub fn note_refusals(&self, policy: &str, now: BTreeSet<String>) {
        let mut seen = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let before = seen.entry(policy.to_string()).or_default();
        let new = now.difference(before).count();
        if new > 0 {
            self.allocations
                .with_label_values(&[policy, "refused"])
                .inc_by(new as u64);
        }
        *before = now;
    }

    pub fn set_policy(&self, policy: &str, node_ports: Option<&NodePortCounts>, conflicts: usize) {
        if let Some(c) = node_ports {
            for (gauge, value) in [
                (&self.node_ports_used, c.used),
                (&self.node_ports_free, c.free),
                (&self.node_ports_reserved, c.reserved),
                (&self.node_ports_pinned, c.pinned),
            ] {
                gauge.with_label_values(&[policy]).set(value as i64);
            }
        }
        self.conflicts.with_label_values(&[policy]).set(conflicts as i64);
        for outcome in ALLOCATION_OUTCOMES {
            self.allocations.with_label_values(&[policy, outcome]);
        }
    }

    pub fn forget_policy(&self, policy: &str) {
        for g in [
            &self.node_ports_used,
            &self.node_ports_free,
            &self.node_ports_reserved,
            &self.node_ports_pinned,
            &self.conflicts,
        ] {
            let _ = g.remove_label_values(&[policy]);
        }
        for outcome in ALLOCATION_OUTCOMES {
            let _ = self.allocations.remove_label_values(&[policy, outcome]);
        }
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(policy);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_and_watch_is_exported_before_anything_happened() {
        let text = Metrics::new().render();
        for kind in Error::METRIC_LABELS {
            let line = format!(r#"portpolicy_operator_reconciliation_errors_total{{kind="{kind}"}} 0"#);
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        for resource in WATCHED_RESOURCES {
            let line = format!(r#"portpolicy_operator_watch_errors_total{{resource="{resource}"}} 0"#);
            assert!(text.contains(&line), "missing {line}");
        }
        for line in [
            "portpolicy_operator_reconciliations_total 0",
            "portpolicy_operator_leader 0",
            "portpolicy_operator_unreadable_policies 0",
            "portpolicy_operator_reconcile_duration_seconds_count 0",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }

    #[test]
    fn renders_counters_and_per_policy_gauges() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.failures.with_label_values(&["kube"]).inc();
        let counts = NodePortCounts {
            total: 100,
            used: 3,
            reserved: 10,
            pinned: 2,
            free: 85,
        };
        m.set_policy("edge", Some(&counts), 2);
        let text = m.render();
        assert!(text.contains("portpolicy_operator_reconciliations_total 1"));
        assert!(text.contains(r#"portpolicy_operator_reconciliation_errors_total{kind="kube"} 1"#));
        assert!(text.contains(r#"portpolicy_operator_node_ports_used{policy="edge"} 3"#));
        assert!(text.contains(r#"portpolicy_operator_node_ports_free{policy="edge"} 85"#));
        assert!(text.contains(r#"portpolicy_operator_node_ports_reserved{policy="edge"} 10"#));
        assert!(text.contains(r#"portpolicy_operator_node_ports_pinned{policy="edge"} 2"#));
        for outcome in ALLOCATION_OUTCOMES {
            let line = format!(
                r#"portpolicy_operator_node_port_allocations_total{{outcome="{outcome}",policy="edge"}} 0"#
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        m.forget_policy("edge");
        assert!(!m.render().contains(r#"policy="edge""#));
    }

    #[test]
    fn a_refusal_is_counted_once_while_it_lasts_and_again_when_it_comes_back() {
        let m = Metrics::new();
        m.set_policy("edge", None, 0);
        let refused = || m.allocations.with_label_values(&["edge", "refused"]).get();
        let full = || BTreeSet::from(["shop/web: range full".to_string()]);
        m.note_refusals("edge", full());
        m.note_refusals("edge", full());
        assert_eq!(refused(), 1);
        m.note_refusals(
            "edge",
            BTreeSet::from([
                "shop/web: range full".to_string(),
                "shop/api: range full".to_string(),
            ]),
        );
        assert_eq!(refused(), 2);
        m.note_refusals("edge", BTreeSet::new());
        m.note_refusals("edge", full());
        assert_eq!(refused(), 3);
        m.count_allocation("edge", "moved");
        assert!(
            m.render().contains(
                r#"portpolicy_operator_node_port_allocations_total{outcome="moved",policy="edge"} 1"#
            )
        );
    }
}
