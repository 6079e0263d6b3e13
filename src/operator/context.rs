//! What every reconcile shares: the client, the watch caches, the event recorder and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

use super::lease::Leadership;
use super::metrics::Metrics;
use super::{Error, Result};
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

/// Whether each watch cache has completed its first list (and its watch still runs).
///
/// The reflector store's own `wait_until_ready` cannot serve here: its readiness sits behind a
/// one-shot channel that remembers only the last waiter, so when the readiness probe, the
/// controller and a reconcile all wait, only one of them wakes (the others wait for ever). This
/// is a watch channel: any number of waiters, and `/readyz` reads it without waiting.
#[derive(Clone)]
pub struct CacheSync {
    state: Arc<tokio::sync::watch::Sender<BTreeMap<&'static str, CacheState>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    Listing,
    Listed,
    /// Its watch stream was dropped: nothing keeps it up to date any more.
    Dropped,
}

impl CacheSync {
    pub fn new(caches: &[&'static str]) -> Self {
        let state = caches.iter().map(|c| (*c, CacheState::Listing)).collect();
        CacheSync {
            state: Arc::new(tokio::sync::watch::Sender::new(state)),
        }
    }

    /// For tests: caches filled by hand, all listed.
    pub fn listed(caches: &[&'static str]) -> Self {
        let sync = Self::new(caches);
        for c in caches {
            sync.mark(c, CacheState::Listed);
        }
        sync
    }

    pub fn mark(&self, cache: &'static str, state: CacheState) {
        self.state.send_if_modified(|caches| {
            let entry = caches.entry(cache).or_insert(CacheState::Listing);
            // Once dropped, a cache stays dropped: a late event cannot revive it.
            let changed = *entry != state && *entry != CacheState::Dropped;
            if changed {
                *entry = state;
            }
            changed
        });
    }

    /// The caches not listed yet (or dropped), for `/readyz` to name; empty when all are.
    pub fn not_synced(&self) -> Vec<(&'static str, CacheState)> {
        self.state
            .borrow()
            .iter()
            .filter(|(_, s)| **s != CacheState::Listed)
            .map(|(c, s)| (*c, *s))
            .collect()
    }

    /// Waits until every cache has listed, so a reconcile never mistakes a cache that is still
    /// filling for Services that are gone (which would mark their ports released).
    pub async fn wait(&self) -> Result<()> {
        let mut rx = self.state.subscribe();
        let caches = rx
            .wait_for(|caches| caches.values().all(|s| *s != CacheState::Listing))
            .await
            .expect("the sender lives in self");
        match caches.iter().find(|(_, s)| **s == CacheState::Dropped) {
            Some((cache, _)) => Err(Error::CacheDropped(cache)),
            None => Ok(()),
        }
    }
}

/// PortPolicies that cannot be read as this operator's type, by name: kept out of the policy
/// cache (so the rest is reconciled) and reported instead.
#[derive(Clone, Default)]
pub(super) struct UnreadablePolicies {
    state: Arc<tokio::sync::watch::Sender<BTreeMap<String, UnreadablePolicy>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnreadablePolicy {
    pub reference: k8s_openapi::api::core::v1::ObjectReference,
    pub resource_version: Option<String>,
    pub problem: portpolicy_core::problem::Problem,
}

impl UnreadablePolicies {
    pub(super) fn is_empty(&self) -> bool {
        self.state.borrow().is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.state.borrow().len()
    }

    pub(super) fn get(&self) -> BTreeMap<String, UnreadablePolicy> {
        self.state.borrow().clone()
    }

    pub(super) fn insert(&self, name: String, policy: UnreadablePolicy) {
        self.state
            .send_if_modified(|m| m.insert(name, policy.clone()).as_ref() != Some(&policy));
    }

    pub(super) fn remove(&self, name: &str) {
        self.state.send_if_modified(|m| m.remove(name).is_some());
    }

    /// Replaces the whole set (after a re-list).
    pub(super) fn replace(&self, all: BTreeMap<String, UnreadablePolicy>) {
        self.state.send_if_modified(|m| {
            let changed = *m != all;
            *m = all;
            changed
        });
    }

    pub(super) fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, UnreadablePolicy>> {
        self.state.subscribe()
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
/// The ports in-flight admission reviews handed out (the webhook's ledger).
pub(super) type InFlight = Arc<dyn Fn() -> Vec<u16> + Send + Sync>;

pub(super) struct Context {
    pub client: Client,
    pub stores: Stores,
    pub caches: CacheSync,
    pub unreadable: UnreadablePolicies,
    /// Checked before every write; a reconcile is cancelled when it turns false.
    pub leadership: Leadership,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub settings: Settings,
    /// The wall clock; tests pass a fixed one so status timestamps are predictable.
    pub clock: Clock,
    /// Ports reserved by in-flight admission reviews, which the reconcile must not hand out.
    pub in_flight: InFlight,
}

impl Context {
    /// Call before every write: only the leader writes.
    pub(super) fn ensure_leading(&self) -> Result<()> {
        if self.leadership.is_leading() {
            Ok(())
        } else {
            Err(Error::LostLeadership)
        }
    }

    pub(super) fn new(
        client: Client,
        stores: Stores,
        caches: CacheSync,
        leadership: Leadership,
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
            caches,
            unreadable: UnreadablePolicies::default(),
            leadership,
            recorder,
            metrics,
            settings,
            clock: Arc::new(chrono::Utc::now),
            in_flight: Arc::new(Vec::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_once_all_caches_listed_and_a_dropped_watch_is_an_error() {
        let caches = CacheSync::new(&["services", "pods"]);
        // Several waiters at once: the reflector store's readiness woke only one of them.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let c = caches.clone();
                tokio::spawn(async move { c.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        caches.mark("services", CacheState::Listed);
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        caches.mark("pods", CacheState::Listed);
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(1), w)
                .await
                .expect("every waiter wakes")
                .unwrap()
                .unwrap();
        }
        caches.mark("pods", CacheState::Dropped);
        // A dropped cache stays dropped even if a late event says listed.
        caches.mark("pods", CacheState::Listed);
        assert!(matches!(caches.wait().await, Err(Error::CacheDropped("pods"))));
        assert_eq!(caches.not_synced(), [("pods", CacheState::Dropped)]);
    }
}
