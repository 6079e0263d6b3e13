//! What every reconcile shares: the client, the watch caches, the event recorder and metrics.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

use super::metrics::Metrics;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::hostport::HostPortPod;
use portpolicy_core::ports::PortRange;

/// The reflector stores a reconcile reads. Reconciles never list from the API server.
#[derive(Clone)]
pub(super) struct Stores {
    pub policies: Store<PortPolicy>,
    pub services: Store<Service>,
    pub pods: Store<HostPortPod>,
    pub namespaces: Store<Namespace>,
    pub daemon_sets: Store<DaemonSet>,
}

impl Stores {
    /// Waits until every store has listed once, so a reconcile never mistakes a cache that is
    /// still filling for Services that are gone (which would mark their ports released).
    pub(super) async fn wait_until_ready(
        &self,
    ) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.policies.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.daemon_sets.wait_until_ready().await
    }
}

/// Settings that come from flags and the environment.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    /// Where the agent DaemonSets live: the operator's own namespace.
    pub namespace: String,
    /// The agent image when a policy names none: the operator's own image.
    pub default_image: String,
    /// The cluster's `--service-node-port-range`.
    pub cluster_range: PortRange,
}

pub(super) type Clock = Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>;

pub(super) struct Context {
    pub client: Client,
    pub stores: Stores,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub settings: Settings,
    /// The wall clock; tests pass a fixed one so status timestamps are predictable.
    pub clock: Clock,
}

impl Context {
    pub(super) fn new(
        client: Client,
        stores: Stores,
        metrics: Metrics,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: super::services::FIELD_MANAGER.into(),
                instance,
            },
        );
        Context {
            client,
            stores,
            recorder,
            metrics,
            settings,
            clock: Arc::new(chrono::Utc::now),
        }
    }
}
