//! The agent's own HTTP endpoint: `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric the agent exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Histogram,
    pub change_to_kernel: Histogram,
    pub ipvs_operations: IntCounterVec,
    pub ipvs_operation_errors: IntCounterVec,
    pub virtual_servers: IntGauge,
    pub real_servers: IntGauge,
    pub sync_errors: IntCounter,
    pub last_successful_sync: Gauge,
    pub full_syncs: IntCounter,
    pub conntrack_entries_deleted: IntCounter,
    pub conntrack_errors: IntCounter,
    pub snapshot_refusals: IntCounter,
    pub snapshot_refused: IntGauge,
    pub resync_drift: IntCounter,
    pub kernel_errors: IntCounterVec,
}

/// The `kind` label of the IPVS operation counters: every kind exists from the start.
pub const IPVS_OPERATION_KINDS: [&str; 6] = [
    "add_service",
    "update_service",
    "delete_service",
    "add_real_server",
    "update_real_server",
    "delete_real_server",
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new(
                "portpolicy_agent_sync_duration_seconds",
                "Time to bring the kernel in line with the plan, per sync.",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0]),
        )
        .expect("valid histogram");
        let change_to_kernel = Histogram::with_opts(
            HistogramOpts::new(
                "portpolicy_agent_change_to_kernel_seconds",
                "Time from a cluster change reaching the agent (a watch event, a snapshot file \
                 change noticed) to the kernel acknowledging the sync that applied it, per sync.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        let ipvs_operations = IntCounterVec::new(
            Opts::new(
                "portpolicy_agent_ipvs_operations_total",
                "IPVS netlink operations sent, by kind.",
            ),
            &["kind"],
        )
        .expect("valid counter");
        let ipvs_operation_errors = IntCounterVec::new(
            Opts::new(
                "portpolicy_agent_ipvs_operation_errors_total",
                "IPVS netlink operations the kernel refused, by kind.",
            ),
            &["kind"],
        )
        .expect("valid counter");
        let virtual_servers = IntGauge::new(
            "portpolicy_agent_virtual_servers",
            "IPVS virtual servers the plan wants on this node.",
        )
        .expect("valid gauge");
        let real_servers = IntGauge::new(
            "portpolicy_agent_real_servers",
            "IPVS real servers the plan wants on this node.",
        )
        .expect("valid gauge");
        let sync_errors = IntCounter::new(
            "portpolicy_agent_sync_errors_total",
            "Syncs that did not fully succeed (they are retried).",
        )
        .expect("valid counter");
        let last_successful_sync = Gauge::new(
            "portpolicy_agent_last_successful_sync_timestamp_seconds",
            "Unix time of the last sync that fully succeeded.",
        )
        .expect("valid gauge");
        let full_syncs = IntCounter::new(
            "portpolicy_agent_full_syncs_total",
            "Syncs that compared the whole kernel table (start-up, resync, retries).",
        )
        .expect("valid counter");
        let conntrack_entries_deleted = IntCounter::new(
            "portpolicy_agent_conntrack_entries_deleted_total",
            "Connection-tracking entries of UDP flows to removed real servers deleted.",
        )
        .expect("valid counter");
        let conntrack_errors = IntCounter::new(
            "portpolicy_agent_conntrack_errors_total",
            "Attempts to clear stale UDP flows that failed (they are retried on the next sync).",
        )
        .expect("valid counter");
        let snapshot_refusals = IntCounter::new(
            "portpolicy_agent_snapshot_refusals_total",
            "Snapshot reads refused because the snapshot could not be read whole.",
        )
        .expect("valid counter");
        let snapshot_refused = IntGauge::new(
            "portpolicy_agent_snapshot_refused",
            "1 while the snapshot on disk is refused and the last good one is programmed.",
        )
        .expect("valid gauge");
        let resync_drift = IntCounter::new(
            "portpolicy_agent_resync_drift_total",
            "Virtual servers a full resync found the kernel holding otherwise than the agent had \
             programmed them (changed by someone else), then repaired.",
        )
        .expect("valid counter");
        let kernel_errors = IntCounterVec::new(
            Opts::new(
                "portpolicy_agent_kernel_errors_total",
                "Netlink requests the kernel refused, by errno name (EUNKNOWN for others).",
            ),
            &["errno"],
        )
        .expect("valid counter");
        for kind in IPVS_OPERATION_KINDS {
            ipvs_operations.with_label_values(&[kind]);
            ipvs_operation_errors.with_label_values(&[kind]);
        }
        for errno in portpolicy_netlink::ERRNO_NAMES {
            kernel_errors.with_label_values(&[errno]);
        }
        for c in [
            Box::new(sync_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(change_to_kernel.clone()),
            Box::new(conntrack_entries_deleted.clone()),
            Box::new(conntrack_errors.clone()),
            Box::new(ipvs_operations.clone()),
            Box::new(ipvs_operation_errors.clone()),
            Box::new(virtual_servers.clone()),
            Box::new(real_servers.clone()),
            Box::new(sync_errors.clone()),
            Box::new(last_successful_sync.clone()),
            Box::new(full_syncs.clone()),
            Box::new(snapshot_refusals.clone()),
            Box::new(snapshot_refused.clone()),
            Box::new(resync_drift.clone()),
            Box::new(kernel_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            sync_duration,
            change_to_kernel,
            ipvs_operations,
            ipvs_operation_errors,
            virtual_servers,
            real_servers,
            sync_errors,
            last_successful_sync,
            full_syncs,
            conntrack_entries_deleted,
            conntrack_errors,
            snapshot_refusals,
            snapshot_refused,
            resync_drift,
            kernel_errors,
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the agent is doing its job: it has synced, recently, and the last sync worked.
/// Shared by `/healthz`, `/readyz` and the health-check node ports (`serviceProxyHealthy`).
#[derive(Clone, Debug)]
pub(crate) struct AgentHealth {
    inner: Arc<Mutex<HealthState>>,
    stale_after: Duration,
}

#[derive(Clone, Debug, Default)]
struct HealthState {
    last_success: Option<Instant>,
    last_failed: bool,
    /// Why the cluster source is not being followed (a snapshot that cannot be read whole).
    source_refused: Option<String>,
}

impl AgentHealth {
    /// Healthy while the last successful sync is younger than two resync periods.
    pub(crate) fn new(resync_period: Duration) -> Self {
        AgentHealth {
            inner: Arc::default(),
            stale_after: resync_period * 2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record(&self, succeeded: bool, at: Instant) {
        let mut s = self.lock();
        s.last_failed = !succeeded;
        if succeeded {
            s.last_success = Some(at);
        }
    }

    /// The source's latest state was refused (`Some(why)`), or accepted again (`None`).
    pub(crate) fn set_source_refused(&self, why: Option<String>) {
        self.lock().source_refused = why;
    }

    pub(crate) fn healthy_at(&self, now: Instant) -> bool {
        let s = self.lock();
        !s.last_failed
            && s.last_success
                .is_some_and(|t| now.saturating_duration_since(t) <= self.stale_after)
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy_at(Instant::now())
    }

    /// Ready once the kernel has been brought in line with the plan at least once, and while
    /// the plan follows the cluster source: `Err(why)` otherwise.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        let s = self.lock();
        if let Some(why) = &s.source_refused {
            return Err(if s.last_success.is_some() {
                format!("{why}; still programming the last good snapshot\n")
            } else {
                format!("{why}; nothing programmed yet\n")
            });
        }
        if s.last_success.is_none() {
            return Err("no successful sync yet\n".into());
        }
        Ok(())
    }
}

/// The router for `--metrics-address`.
pub(crate) fn router(metrics: Metrics, health: AgentHealth) -> Router {
    let ready = health.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = health.healthy();
                async move { status(ok, "sync is failing or stale") }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let readiness = ready.readiness();
                async move {
                    match readiness {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

fn status(ok: bool, why_not: &'static str) -> impl IntoResponse {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, why_not)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_recent_successful_sync() {
        let health = AgentHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(!health.healthy_at(t0));
        assert!(health.readiness().is_err());
        health.record(true, t0);
        assert!(health.healthy_at(t0 + Duration::from_secs(119)));
        assert!(!health.healthy_at(t0 + Duration::from_secs(121)));
        health.record(false, t0 + Duration::from_secs(1));
        assert!(!health.healthy_at(t0 + Duration::from_secs(2)));
        assert!(health.readiness().is_ok());
    }

    #[test]
    fn metrics_render_in_prometheus_text() {
        let m = Metrics::new();
        m.ipvs_operations
            .with_label_values(&["add_real_server"])
            .inc_by(3);
        m.sync_errors.inc();
        let text = m.render();
        assert!(text.contains("portpolicy_agent_ipvs_operations_total{kind=\"add_real_server\"} 3"));
        assert!(text.contains("portpolicy_agent_sync_errors_total 1"));
        assert!(text.contains("# TYPE portpolicy_agent_sync_duration_seconds histogram"));
    }

    #[test]
    fn every_labelled_family_is_exported_before_anything_happened() {
        let text = Metrics::new().render();
        for kind in IPVS_OPERATION_KINDS {
            for family in ["ipvs_operations_total", "ipvs_operation_errors_total"] {
                let line = format!("portpolicy_agent_{family}{{kind=\"{kind}\"}} 0");
                assert!(text.contains(&line), "missing {line} in\n{text}");
            }
        }
        for errno in ["EEXIST", "ENOENT", "EUNKNOWN"] {
            let line = format!("portpolicy_agent_kernel_errors_total{{errno=\"{errno}\"}} 0");
            assert!(text.contains(&line), "missing {line}");
        }
        assert!(text.contains("portpolicy_agent_resync_drift_total 0"));
    }
}
