//! Prometheus metrics of the operator. Label values are bounded: error kinds are a fixed set and
//! policy names are as many as the cluster has PortPolicies (removed when a policy is deleted).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub node_ports_used: IntGaugeVec,
    pub node_ports_free: IntGaugeVec,
    pub conflicts: IntGaugeVec,
    pub watch_errors: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
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
        let duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconciliation took")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .unwrap();
        let node_ports_used = IntGaugeVec::new(
            Opts::new(
                "node_ports_used",
                "nodePorts a policy holds, released-but-retained included",
            ),
            &["policy"],
        )
        .unwrap();
        let node_ports_free = IntGaugeVec::new(
            Opts::new("node_ports_free", "nodePorts a policy can still hand out"),
            &["policy"],
        )
        .unwrap();
        let conflicts = IntGaugeVec::new(
            Opts::new("host_port_conflicts", "hostPort conflicts a policy reports"),
            &["policy"],
        )
        .unwrap();
        let watch_errors = IntCounterVec::new(
            Opts::new("watch_errors_total", "Errors of the watches, by watched kind"),
            &["resource"],
        )
        .unwrap();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(node_ports_used.clone()),
            Box::new(node_ports_free.clone()),
            Box::new(conflicts.clone()),
            Box::new(watch_errors.clone()),
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
            conflicts,
            watch_errors,
        }
    }

    pub fn set_policy(&self, policy: &str, used: Option<(usize, usize)>, conflicts: usize) {
        if let Some((used, total)) = used {
            self.node_ports_used.with_label_values(&[policy]).set(used as i64);
            self.node_ports_free
                .with_label_values(&[policy])
                .set(total.saturating_sub(used) as i64);
        }
        self.conflicts.with_label_values(&[policy]).set(conflicts as i64);
    }

    pub fn forget_policy(&self, policy: &str) {
        for g in [&self.node_ports_used, &self.node_ports_free, &self.conflicts] {
            let _ = g.remove_label_values(&[policy]);
        }
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
    fn renders_counters_and_per_policy_gauges() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.failures.with_label_values(&["kube"]).inc();
        m.set_policy("edge", Some((3, 100)), 2);
        let text = m.render();
        assert!(text.contains("portpolicy_operator_reconciliations_total 1"));
        assert!(text.contains(r#"portpolicy_operator_reconciliation_errors_total{kind="kube"} 1"#));
        assert!(text.contains(r#"portpolicy_operator_node_ports_free{policy="edge"} 97"#));
        m.forget_policy("edge");
        assert!(!m.render().contains(r#"policy="edge""#));
    }
}
