//! Wiring: watches, the controller, leader election and the HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};

use super::agent::POLICY_LABEL;
use super::context::{Context, Settings, Stores};
use super::lease::Elector;
use super::metrics::Metrics;
use super::reconcile::{error_policy, reconcile};
use super::server::{self, Health};
use super::services::{self, key_of};
use super::{Error, Result};
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::hostport::HostPortPod;
use portpolicy_core::ports::PortRange;
use portpolicy_core::service::ServiceModel;
use portpolicy_core::well_known::NAMESPACE_NAME_LABEL;

/// Flags of `portpolicy operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTPOLICY_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,
    /// The operator's namespace, where agent DaemonSets and the leader Lease live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portpolicy-system")]
    pub namespace: String,
    /// Default agent image (the operator's own).
    #[arg(
        long,
        env = "PORTPOLICY_IMAGE",
        default_value = "ghcr.io/portpolicy/portpolicy:latest"
    )]
    pub image: String,
    /// The cluster's --service-node-port-range.
    #[arg(long, env = "PORTPOLICY_NODE_PORT_RANGE", default_value = "30000-32767")]
    pub node_port_range: PortRange,
    /// This replica's name in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Policies reconciled at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
}

/// Watches `api` into a store, counting errors; a bad object or a failed watch is retried with
/// backoff and never ends the stream.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    metrics: &Metrics,
    kind: &'static str,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let errors = metrics.watch_errors.with_label_values(&[kind]);
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .inspect_err(move |error| {
            errors.inc();
            tracing::warn!(%error, kind, "watch error; retrying");
        });
    (reader, stream)
}

fn all_policies(store: &Store<PortPolicy>) -> Vec<ObjectRef<PortPolicy>> {
    store.state().iter().map(|p| ObjectRef::from_obj(&**p)).collect()
}

fn namespace_labels(namespaces: &Store<Namespace>, ns: &str) -> portpolicy_core::governance::Labels {
    let mut labels = namespaces
        .get(&ObjectRef::new(ns))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), ns.into());
    labels
}

/// Policies a Service change concerns: those selecting it, those holding a record for it (it
/// may be a re-created Service getting its port back, or a deleted one to record as released),
/// and all of them when the operator holds fields on a Service that no policy selects now.
fn policies_for_service(
    service: &Service,
    policies: &Store<PortPolicy>,
    namespaces: &Store<Namespace>,
) -> Vec<ObjectRef<PortPolicy>> {
    let (ns, name) = key_of(&ServiceModel::read(service));
    let ns_labels = namespace_labels(namespaces, &ns);
    let mut out = Vec::new();
    for policy in policies.state() {
        let selects = policy
            .compile()
            .is_ok_and(|c| c.selects_service(Some(&ns_labels), service.metadata.labels.as_ref()));
        let recorded = policy
            .status
            .iter()
            .flat_map(|s| &s.allocations)
            .any(|r| r.namespace == ns && r.service == name);
        if selects || recorded {
            out.push(ObjectRef::from_obj(&*policy));
        }
    }
    if out.is_empty() && services::managed_by_operator(service) {
        return all_policies(policies);
    }
    out
}

/// Policies a Pod change concerns: only Pods that can hold host ports matter, and only to the
/// policies whose namespace selector covers them.
fn policies_for_pod(
    pod: &HostPortPod,
    policies: &Store<PortPolicy>,
    namespaces: &Store<Namespace>,
) -> Vec<ObjectRef<PortPolicy>> {
    if pod.spec.containers.is_empty() && pod.spec.init_containers.is_empty() {
        return Vec::new();
    }
    let ns_labels = namespace_labels(namespaces, pod.namespace());
    policies
        .state()
        .iter()
        .filter(|p| p.compile().is_ok_and(|c| c.selects_namespace(Some(&ns_labels))))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

pub async fn run(args: OperatorArgs) -> Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::new();
    let health = Health::default();
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .ok_or_else(|| Error::Config("set POD_NAME or --identity for the leader Lease".into()))?;

    let server = tokio::spawn(server::serve(
        args.metrics_address,
        metrics.clone(),
        health.clone(),
    ));

    let elector = Elector::new(client.clone(), &args.namespace, &identity);
    elector.acquire().await;
    health.leader.store(true, Ordering::Relaxed);

    let list = watcher::Config::default().any_semantic();
    let controller = Controller::new(Api::<PortPolicy>::all(client.clone()), list.clone()).with_config(
        ControllerConfig::default()
            .concurrency(args.concurrency)
            .debounce(Duration::from_secs(1)),
    );
    let policies = controller.store();
    let (services, service_events) = reflect(
        Api::<Service>::all(client.clone()),
        list.clone(),
        &metrics,
        "services",
    );
    let (pods, pod_events) = reflect(
        Api::<HostPortPod>::all(client.clone()),
        list.clone(),
        &metrics,
        "pods",
    );
    let (namespaces, namespace_events) = reflect(
        Api::<Namespace>::all(client.clone()),
        list.clone(),
        &metrics,
        "namespaces",
    );
    let (daemon_sets, daemon_set_events) = reflect(
        Api::<DaemonSet>::namespaced(client.clone(), &args.namespace),
        list.clone().labels(POLICY_LABEL),
        &metrics,
        "daemonsets",
    );
    let node_errors = metrics.watch_errors.with_label_values(&["nodes"]);
    // Nodes only matter when their labels change (policies' node selectors); their frequent
    // status heartbeats must not trigger anything, and their (large) objects are never stored.
    let node_events = watcher(Api::<PartialObjectMeta<Node>>::all(client.clone()), list.clone())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::labels, Default::default())
        .inspect_err(move |error| {
            node_errors.inc();
            tracing::warn!(%error, "node watch error; retrying");
        });

    let stores = Stores {
        policies: policies.clone(),
        services,
        pods,
        namespaces: namespaces.clone(),
        daemon_sets,
    };
    let ready_flag = health.synced.clone();
    let ready_stores = stores.clone();
    tokio::spawn(async move {
        if ready_stores.wait_until_ready().await.is_ok() {
            ready_flag.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
        }
    });

    let settings = Settings {
        namespace: args.namespace.clone(),
        default_image: args.image.clone(),
        cluster_range: args.node_port_range,
    };
    let ctx = Arc::new(Context::new(client, stores, metrics, settings, Some(identity)));

    let (p1, n1) = (policies.clone(), namespaces.clone());
    let (p2, n2) = (policies.clone(), namespaces.clone());
    let (p3, p4) = (policies.clone(), policies.clone());
    let controller = controller
        .owns_stream(daemon_set_events)
        .watches_stream(service_events, move |svc| policies_for_service(&svc, &p1, &n1))
        .watches_stream(pod_events, move |pod| policies_for_pod(&pod, &p2, &n2))
        .watches_stream(namespace_events, move |_| all_policies(&p3))
        .watches_stream(node_events, move |_| all_policies(&p4))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "controller event");
            }
        });

    tokio::select! {
        _ = controller => tracing::info!("controller stopped"),
        _ = elector.hold() => return Err(Error::Config("lost leadership".into())),
        result = server => {
            let error = match result {
                Ok(Ok(())) => "server stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(Error::Config(format!("metrics server: {error}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn store<K: kube::Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> Store<K> {
        let (reader, mut writer) = reflector::store();
        for o in objects {
            writer.apply_watcher_event(&Event::Apply(o));
        }
        reader
    }

    fn policy(name: &str, spec: serde_json::Value) -> PortPolicy {
        serde_json::from_value(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<PortPolicy>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn service_changes_go_to_selecting_or_recording_policies() {
        let mut recording = policy(
            "recording",
            json!({"serviceSelector": {"matchLabels": {"x": "y"}}}),
        );
        recording.status = Some(
            serde_json::from_value(json!({"allocations": [{"namespace": "shop", "service": "web",
            "kind": "Service", "nodePort": 31000}]}))
            .unwrap(),
        );
        let policies = store(vec![
            policy(
                "edge",
                json!({"namespaceSelector": {"matchLabels": {"team": "shop"}}}),
            ),
            policy(
                "other",
                json!({"namespaceSelector": {"matchLabels": {"team": "else"}}}),
            ),
            recording,
        ]);
        let namespaces = store(vec![
            serde_json::from_value::<Namespace>(
                json!({"metadata": {"name": "shop", "labels": {"team": "shop"}}}),
            )
            .unwrap(),
        ]);
        let web: Service =
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"}})).unwrap();
        let mut got = names(policies_for_service(&web, &policies, &namespaces));
        got.sort();
        assert_eq!(got, ["edge", "recording"]);

        let pod_without_host_ports: HostPortPod = serde_json::from_value(json!({"metadata": {"name": "p",
            "namespace": "shop"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}))
        .unwrap();
        assert!(policies_for_pod(&pod_without_host_ports, &policies, &namespaces).is_empty());
        let pod: HostPortPod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]}}))
        .unwrap();
        let mut got = names(policies_for_pod(&pod, &policies, &namespaces));
        got.sort();
        // "recording" has no namespace selector: its hostPort rules cover every namespace.
        assert_eq!(got, ["edge", "recording"]);
    }
}
